"""corolla's OpenAI-compatible HTTP API and its web chat page (``corolla api``).

The outer shell over the client: requests are validated (:mod:`.schemas`), turned into one
transformers ``generate`` call per request on a distributed model (:mod:`.engine`), and answered in
OpenAI's JSON and server-sent-event formats (:mod:`.responses`, :mod:`.app`). Sampling, stopping and
streaming stay transformers'; this package adds only what OpenAI's API means and transformers lacks:
OpenAI's presence/frequency penalties, stop strings cut out of the returned text, and logprobs.
"""
