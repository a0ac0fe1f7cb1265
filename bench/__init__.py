"""Benchmarks of flaap-mq against TFF's own remote path; run `python -m bench.run`.

TensorFlow reads its log level when it is first imported, and importing
`flaap_mq` imports TensorFlow, so the level is set here, before either
(3: TensorFlow's C++ start-up noise is hidden; real failures still surface
as Python exceptions). Worker subprocesses inherit it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
