"""The life of a run, as ``scripts/train.py`` drives it: its directory and lock (``runs.py``, ``run_lock.py``), the
record of its config and launches (``run_record.py``), and checkpoint writes a crash cannot damage
(``checkpoint_io.py``).

Imports flow one way: scripts -> lifecycle -> callbacks / lightning_modules; nothing here is a researcher's
concern when writing a module or a datamodule.
"""
