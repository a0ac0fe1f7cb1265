"""Silo-resident data: datasets read on the silo that holds them, never sent anywhere.

* `silo_dataset(name, element_spec)`: a TFF computation that loads the
  dataset `name` from the silo's data directory (`flaap-mq worker
  --data-dir`); use it with `tff.federated_eval(..., tff.CLIENTS)`.
* `save_silo_dataset` / `read_silo_dataset`: write a dataset in that format;
  read one here (tests, references on one machine).
* `flaap_mq.data.digits`: label-skewed silo partitions of scikit-learn's
  digits (`flaap-mq data split-digits`).
"""

from flaap_mq.data.silo import read_silo_dataset, save_silo_dataset, silo_dataset

__all__ = ["read_silo_dataset", "save_silo_dataset", "silo_dataset"]
