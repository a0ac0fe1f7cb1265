"""Federated training on silo-resident data: `flaap-mq train`.

* `config.TrainingConfig`: what a run does (rounds, seed, local epochs, ...).
* `fedavg.SiloFedAvg`: `tff.learning` weighted FedAvg whose client data is
  loaded on the silos (`flaap_mq.data.silo_dataset` + `tff.federated_eval`).
* `run.train`: the loop: rounds, Keras evaluation on the coordinator,
  progress bar, one `training_round` event per round, metrics.csv and
  accuracy.png.
* `records`: what a round and a run leave (`RoundRecord`, `TrainingResult`);
  `plot.plot_accuracy` draws accuracy.png from them; `progress` keeps log
  lines above the progress bars.
* `model`: the Keras model trained and the silos' preprocessing; `cli`: the
  `train` and `data split-digits` commands.
* `meter.PayloadMeter`: executor payload bytes per round and per silo.
* `run_dir.RunDirectory`: the run's `--out` directory: state saved after every
  round and metrics released with TFF's program API, a run resumed, a
  directory of another configuration refused.
"""
