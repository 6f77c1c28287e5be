"""The experiment library under train/compare.py, report.py, probe.py, ceiling.py and benchmark.py: the comparison
and its config (:mod:`.comparison`, :mod:`.compare_config`), the frozen-feature cache, peers, stored results and
the report (:mod:`.feature_cache`, :mod:`.peers`, :mod:`.results`, :mod:`.reporting`, :mod:`.gate_proof`), the
resolution ceiling (:mod:`.resolution`), linear probes (:mod:`.probing`) and the benchmarks (:mod:`.benchmarking`).
Built on train/training/, never the other way round."""
