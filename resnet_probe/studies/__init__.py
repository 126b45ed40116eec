"""Studies: each answers one question from the papers and writes one run folder with its report.

Every study is a module with a frozen settings dataclass (``tiny()``, ``quick()``, ``paper()``
presets), a ``run(settings, models, data, ...) -> StudyResult`` function that returns its tables,
and a ``COMMAND`` from which ``command`` builds its command line (``resnet-probe STUDY``,
``studies/STUDY.py``). Studies compose in Python: ``quickstart`` calls the others' ``run``.
"""
STUDIES = ("train_zoo", "degradation", "response_std", "gradients", "lesion", "paths", "highway", "similarity",
           "refinement", "landscape", "shattered", "quickstart")
