"""Run folders: recognising them, locking them, and checkpoint I/O.

Training writes run folders; evaluation, diagnosis and reporting read them. All of them go
through this package, so that nothing downstream reaches into the trainer's package.
"""
