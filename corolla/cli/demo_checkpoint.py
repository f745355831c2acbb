"""A tiny, random, locally built Llama checkpoint for `corolla demo`.

`corolla demo` without `--model` must work offline, so this module builds a complete Hugging Face
checkpoint folder from nothing: a byte-level BPE tokenizer trained on a few paragraphs of English
kept below, and a 4-layer Llama with random weights. The model has never been trained, so the text
it generates is random; `DEMO_NOTICE` says so and the CLI should print it.

Decisions:

- **Where.** `$COROLLA_CACHE_DIR/demo-llama` if `COROLLA_CACHE_DIR` is set, else
  `$XDG_CACHE_HOME/corolla/demo-llama`, else `~/.cache/corolla/demo-llama`. `cache_dir` (tests,
  callers with their own layout) plays the role of the corolla cache root, so the checkpoint lands
  in `cache_dir/demo-llama`.
- **Complete or absent.** Everything is written into a temporary sibling folder, a marker file is
  written last, and the folder is renamed into place. A folder whose marker is missing or names an
  older recipe is treated as absent and rebuilt. If another process wins the rename race, its
  finished checkpoint is used and ours is thrown away.
- **Deterministic.** Weights come from a fixed seed inside `torch.random.fork_rng`, so the
  caller's RNG state is untouched and two builds give identical tensors; BPE training is
  deterministic for a fixed corpus.
- **Shaped like a real checkpoint.** Saved sharded (`max_shard_size=1MB`, a few shards plus
  `model.safetensors.index.json`), in fp32, with a generation config and a chat template, so
  loading code that only reads the shards holding its blocks is exercised by the demo too.
- **Vocab = tokenizer size.** The config's `vocab_size` is exactly `len(tokenizer)`, and
  bos/eos/pad ids are read back from the tokenizer rather than hard-coded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from corolla.paths import cache_dir

__all__ = ["DEMO_NOTICE", "DEMO_FOLDER_NAME", "default_cache_root", "ensure_demo_checkpoint"]

logger = logging.getLogger(__name__)

DEMO_FOLDER_NAME = "demo-llama"
DEMO_NOTICE = (
    "Using corolla's built-in demo model: a tiny Llama with RANDOM, untrained weights. "
    "Its output is random text; pass --model to run a real model."
)

# Bump whenever the recipe below changes, so stale caches are rebuilt rather than reused.
_RECIPE_VERSION = "1"
_MARKER_NAME = ".corolla-demo-complete"
_SEED = 1234
_VOCAB_SIZE = 1536
_MAX_SHARD_SIZE = "1MB"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>\n{content}</s>\n"; a generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Original text written for this module; only used to learn BPE merges.
_CORPUS = """\
Every morning the old ferry crossed the river twice, once with the baker's bread and once with the
children who went to school on the far bank. The captain knew each of them by name. When the water
was high in spring he would slow the engine and tell them stories about the years when the bridge
upstream had not yet been built, and the whole valley depended on his small boat.

A garden teaches patience better than any book. You plant seeds in cold soil and nothing seems to
happen for weeks. Then, one warm afternoon, a line of green appears along the row, and you realise
that the work was going on all along, quietly, underneath, where you could not see it. Tomatoes,
beans and sunflowers each keep their own calendar.

Computers are very fast at following instructions and very bad at guessing what we meant. A program
is a careful list of steps, written so precisely that a machine with no common sense can carry it
out. Most of the craft of programming is not typing; it is thinking about the cases nobody
mentioned: the empty list, the missing file, the network that drops a message halfway through.

Large language models are too big for most single computers, so people have started to share them.
In a swarm, each machine keeps a few layers of the network in memory. A request travels from one
server to the next, like a letter passed along a chain of friends, and the answer comes back one
word at a time. If a server leaves, the client finds another that holds the same layers and goes on.

The library on the corner opens at nine and closes at six, except on Thursdays, when it stays open
late for the chess club. On rainy days it is full of students, retired teachers and a few tourists
who came in to dry their coats and stayed for an hour reading about the history of the town.

Why do birds fly south? Some follow the food, some follow the warmth, and many simply follow the
route their parents took. Scientists have tracked small songbirds across whole continents with
tiny tags that weigh less than a paper clip. The numbers are astonishing: thousands of kilometres,
often at night, guided by the stars, the sun and the magnetic field of the earth itself.

Cooking for friends is mostly about timing. The soup can wait, the bread should be warm, and the
pasta must never sit in the pot for too long. A good host starts early, tastes everything twice,
and keeps a clean spoon nearby. Salt, lemon and a little butter fix more dishes than any recipe.

Winter in the mountains arrives suddenly. One evening the peaks are grey and bare; the next morning
they are white down to the pine forest, and the shepherds bring their flocks into the lower fields.
Villagers stack firewood against the walls, mend the roofs and check that the road to the market
town is still clear before the heavy snow closes it for weeks.

Writing a letter by hand has become unusual, which is perhaps why people treasure the ones they
receive. The paper carries the pressure of the pen, a crossed-out word, a coffee stain near the
corner. An email can be copied a thousand times without changing, but a letter exists only once,
and whoever keeps it is keeping a small piece of someone else's afternoon.

Trains connect cities, but they also connect habits. The commuter who reads the newspaper on the
seven fifteen, the musician practising scales with headphones, the grandmother knitting a scarf
for a grandchild she visits every Sunday: each of them measures the week in departures, platforms
and the familiar voice announcing delays, arrivals and changes of track.

Questions, answers and small talk: Hello! How are you today? I am fine, thank you. What would you
like to know? Tell me a short story, please. Can you explain how this works? Yes, of course. First
we load the model, then we send the prompt, and finally we read the reply. Numbers like 0, 1, 2,
3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in text too, as do symbols such as ( ) [ ] { } ,
. ; : ! ? ' " - + = * / % & # @ and the newline at the end of a line.
"""


def default_cache_root() -> Path:
    """The corolla cache root (`corolla.paths.cache_dir`: `$COROLLA_CACHE_DIR`, else ...)."""
    return cache_dir()


def ensure_demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """Return the demo checkpoint folder, building it first if no complete one is cached.

    `cache_dir` is the corolla cache root (default: `default_cache_root()`); the checkpoint is
    `cache_dir / "demo-llama"`.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / DEMO_FOLDER_NAME
    if _is_complete(target):
        logger.debug("Reusing demo checkpoint at %s", target)
        return target

    root.mkdir(parents=True, exist_ok=True)
    logger.info("Building the random demo checkpoint in %s (one-off, offline)", target)
    # Not mkdtemp: that makes a 0700 folder, and the cache should get the user's usual permissions.
    staging = root / f".{DEMO_FOLDER_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _build_checkpoint(staging)
        (staging / _MARKER_NAME).write_text(_RECIPE_VERSION + "\n")
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Demo checkpoint ready at %s", target)
    return target


def _is_complete(folder: Path) -> bool:
    try:
        return (folder / _MARKER_NAME).read_text().strip() == _RECIPE_VERSION
    except OSError:
        return False


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        # Incomplete or from an older recipe (complete ones returned early): replace it. Move it
        # aside first so the swap is a rename, and a concurrent reader never sees a half-deleted tree.
        trash = Path(tempfile.mkdtemp(prefix=f".{DEMO_FOLDER_NAME}.old-", dir=target.parent))
        try:
            target.rename(trash / "old")
        except FileNotFoundError:
            pass  # someone else removed it meanwhile
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        # A concurrent build finished first; its checkpoint is identical, so use it.
        if not _is_complete(target):
            raise


def _build_checkpoint(folder: Path) -> None:
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(folder)
    _build_model(tokenizer).save_pretrained(folder, max_shard_size=_MAX_SHARD_SIZE)
    (folder / "README.md").write_text(
        "# corolla demo checkpoint\n\n"
        f"{DEMO_NOTICE}\n\n"
        "Built locally by `corolla.cli.demo_checkpoint`; safe to delete, it is rebuilt on demand.\n"
    )


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, UNK, *ROLE_TOKENS]
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    # Like Llama: plain encodes start with BOS; chat templates add BOS themselves and are encoded
    # without special tokens, so a conversation gets exactly one.
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()
