"""The model layer: the Llama-family decoder (`llama`), its tensor-parallel building blocks (`layers`),
checkpoint loading (`loader`), sampling (`sampler`), the demo checkpoint (`demo`) and the per-step
attention metadata (`forward_context`). Import the submodules directly: this package stays empty so
that importing one does not pull in transformers."""
