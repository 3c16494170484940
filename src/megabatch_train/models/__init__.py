"""The models a run trains: `towers.py`'s built-in ViT/CNN and text transformer joined into a CLIP-like
model (and the text-text model of `--data wordnet`), `minilm.py`'s pretrained MiniLM-L6 text tower, and
`hf_model.py`'s Hugging Face dual encoders (`--model hf:PATH`)."""
