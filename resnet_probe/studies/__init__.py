"""Studies: each module answers one question from the papers and writes one report run folder.

Every study has ``main(argv=None) -> pathlib.Path`` (the run folder) and a thin executable script under
``studies/``. Shared command-line options live in ``options``.
"""
