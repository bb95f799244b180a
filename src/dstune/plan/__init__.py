"""Memory planning: what a run needs per device before it is launched, and the fastest setup that fits.

``estimate`` turns a run config (plus devices, ZeRO stage and offload) into a per-device breakdown from
the model's config alone; ``search`` gives the verdict on a GPU and the fastest configuration that fits,
and ``fit(cfg, budget)`` what ``train --auto-fit`` applies (``autofit``). ``dstune.train.measure`` (a layer
up: it runs dstune's own step) is the tracking allocator that the tests and ``benchmarks/bench_plan.py``
check the estimate against. Invariant: nothing here loads weights; the model is built on PyTorch's meta
device.
"""
