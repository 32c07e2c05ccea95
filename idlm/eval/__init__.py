"""`idlm eval`: alpha (introspection.py), HumanEval (humaneval.py, run through execution.py and
sandbox.py), question/answer JSONL files (jsonl_bench.py, extract.py) and perplexity
(perplexity.py); generation comes from the offline engine or a server (client.py)."""
