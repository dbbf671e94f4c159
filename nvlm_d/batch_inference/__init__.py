"""Batch inference with NVLM-D: a JSON Lines file of requests answered into a crash-safe, resumable result log.

    requests = read_requests("requests.jsonl")  # bad lines become requests carrying their error
    with ResultLog("answers.jsonl") as log:  # cuts a torn last line, locks the file, knows what is done
        answer_requests(log.pending(requests), log, model, tokenizer, BatchSettings(max_num=6, max_new_tokens=1024))

One module a job: `requests` (reading and checking), `results` (the log and resuming), `prefetch` (loading images
ahead), `planning` (which requests share a batch, records back in input order), `sampling` (a generator per
request), `engine` (the answering loop). `nvlm-d batch` is argument parsing and output around them. Nothing here
imports torch or transformers at import time.
"""

from .engine import BatchProgress, BatchSettings, answer_requests, record_errors
from .requests import BatchRequest, RequestFileError, read_requests
from .results import ResultLog, ResultLogError

__all__ = [
    "BatchProgress",
    "BatchRequest",
    "BatchSettings",
    "RequestFileError",
    "ResultLog",
    "ResultLogError",
    "answer_requests",
    "read_requests",
    "record_errors",
]
