"""What the GPU check (train/gpu_check.py) runs on: its job runner (:mod:`.jobs`) and its stored CPU reference
(gpu_check_reference.json, rewritten by ``python train/gpu_check.py --write-reference``)."""
