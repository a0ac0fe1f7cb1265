"""Silo-resident data: datasets read on the silo that holds them, never sent anywhere.

* `silo_dataset(name, element_spec)`: a TFF computation that loads the
  dataset `name` from the silo's data directory (`flaap-mq worker
  --data-dir`); use it with `tff.federated_eval(..., tff.CLIENTS)`.
* `save_silo_dataset` / `read_silo_dataset`: write a dataset in that format;
  read one here (tests, references on one machine).
* `flaap_mq.data.digits`: label-skewed silo partitions of scikit-learn's
  digits (`flaap-mq data split-digits`).

The names are imported on first use: importing this package does not load
TensorFlow (the `flaap-mq` command imports `flaap_mq.data.layout`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["read_silo_dataset", "save_silo_dataset", "silo_dataset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flaap_mq.data import silo

        return getattr(silo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
