"""What a run reports: held-out evaluation (`evaluate.py`), metrics.jsonl and the summary (`report.py`),
curves.png (`plots.py`), and the run directory itself (`outputs.py`)."""
