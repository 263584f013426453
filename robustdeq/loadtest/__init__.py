"""Load tests of a RobustDEQ server with Locust (``loadtest/locustfile.py``, ``robustdeq loadtest``).

``traffic``: payloads with expected labels, the answer check, load stages;
``samples``: every request recorded, exact percentiles; ``runner``: the scenarios
(saturation, defended, isolation, soak, batching), the in-process comparison, the
report and its plots.
"""
