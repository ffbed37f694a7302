"""What every fusedopt benchmark shares, so each benchmark script only says what it compares.

- :mod:`.workloads`: parameter shapes (ResNet-50, GPT-2 small, BERT-base, 5000 x 1000, many tiny
  tensors) and the small Hessian models.
- :mod:`.timing`: warm-up, interleaved repetitions, median and min-max spread, the noisy flag.
- :mod:`.compare`: runs named candidates side by side and turns the times into table rows.
- :mod:`.peers`: other libraries' implementations, used when installed and skipped otherwise.
- :mod:`.environment`: device, CPU, torch/fusedopt versions, build facts, git commit, date.
- :mod:`.report`: tables, the speed-up header, JSON files that never overwrite a tracked file.
- :mod:`.progress`: a progress bar (tqdm when installed, else a plain line).
- :mod:`.cli`: the command-line options and checks every benchmark takes.

Only fusedopt's public API is used here (the optimizer classes, ``fusedopt.functional``,
``fusedopt.hessian``), so the benchmarks keep measuring the same thing when internals change.
"""
