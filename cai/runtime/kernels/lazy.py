"""`LazyFunction`, for the room of autograd functions with hand-written backwards (cai.runtime.kernels), made for
the forwards cai trains and scores with on the CPU. Each computes what the layers it stands in for compute, in
fewer passes over memory (tested against them).

- `logprobs`: log-probabilities of the chosen tokens at a temperature, without logits-sized temporaries;
- `norms`: an RMSNorm as one node (the training forwards' norms, cai.runtime.forward.training_layers);
- `attention`: a packed row's attention one segment at a time (cai.runtime.packing on the CPU).

The fused LoRA and oneDNN linears stay beside the products they call (cai.runtime.forward). torch is imported
inside the factories that `LazyFunction` calls on first use: these modules are imported by light ones."""

from __future__ import annotations


class LazyFunction:
    """An autograd Function, made by `factory` on first use so that importing its module does not import torch."""

    def __init__(self, factory):
        self.factory, self.fn = factory, None

    def apply(self, *args):
        if self.fn is None:
            self.fn = self.factory()
        return self.fn.apply(*args)
