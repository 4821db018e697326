"""Where models come from: a Hub id or folder, the offline GGUF conversion (``model_source.py``) and the
tiny random model of tests and the default first run (``tiny_model.py``)."""
