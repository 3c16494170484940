"""`megabatch study`: held-out retrieval against the contrastive batch size (`study.py`; `--data wordnet`:
`wordnet_study.py`), with what every study records beside its numbers (`record.py`)."""
