"""Files in and out, shared by every layer: atomic writes (:mod:`.atomic`), where a model's files are found
locally or on the Hugging Face Hub (:mod:`.model_files`), weight files (:mod:`.weights`), images decoded into
tensors (:mod:`.images`) and PNG figures (:mod:`.figures`). The bottom layer, so that router/ and train/ use
them without importing each other (tests/test_layers.py)."""
