"""Writes examples/colab_demo.ipynb (source of truth for the notebook's cells; outputs are not
committed: the test suite executes the notebook top to bottom)."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# nld-jax: three ways to decode one checkpoint\n\n"
       "Nemotron-Labs-Diffusion (NLD) decodes **autoregressively**, by **block diffusion** (a block of masked "
       "tokens filled in parallel) and by **linear self-speculation** (diffusion drafts a block, a causal pass "
       "verifies it) with the same weights. This notebook runs all three with `nld_jax`, compares tokens per "
       "forward (TPF) and speed, and shows *how* each mode decodes.\n\n"
       "**Runtime**: CPU, GPU or TPU. On Colab, choose a runtime, then run the install cell."),
    code("# Install (Colab): clone the nld-jax repository into the runtime and install it.\n"
         "# On a TPU runtime, install jax[tpu] first; on a GPU runtime, jax[cuda12].\n"
         "import importlib.util, subprocess, sys\n"
         "if importlib.util.find_spec('nld_jax') is None:\n"
         "    if 'google.colab' in sys.modules:\n"
         "        print('Upload or git clone the nld-jax repository, then run:  !pip install -q -e nld-jax')\n"
         "    raise SystemExit('nld_jax is not installed: pip install -e <path to nld-jax>')\n"
         "import jax, nld_jax\n"
         "print('jax', jax.__version__, 'backend:', jax.default_backend(), jax.devices())"),
    md("## Load a model\n\n`nld_jax.load()` with no path loads the small model embedded in the package (trained "
       "with this project's own training code on Python standard-library source). A real NVIDIA checkpoint "
       "loads the same way from its directory:\n\n"
       "```python\n"
       "from huggingface_hub import snapshot_download          # pip install huggingface_hub\n"
       "path = snapshot_download('nvidia/Nemotron-Labs-Diffusion-8B')\n"
       "model = nld_jax.load(path, dtype='bfloat16')          # or convert once: nld-convert path /ckpt/nld-8b\n"
       "```"),
    code("model = nld_jax.load()\n"
         "cfg = model.config\n"
         "print(f'{cfg.num_params() / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, {cfg.num_hidden_layers} layers, '\n"
         "      f'block size {cfg.block_size}, draft LoRA: {model.lora is not None}')"),
    md("## Generate in the three modes"),
    code("prompt = 'def read_config(path):\\n    \"\"\"Read a configuration file and return a dict.\"\"\"\\n'\n"
         "settings = {\n"
         "    'ar': dict(mode='ar'),\n"
         "    'diffusion (thr 0.9)': dict(mode='diffusion', threshold=0.9),\n"
         "    'spec': dict(mode='spec'),\n"
         "    'spec + LoRA': dict(mode='spec', use_lora=model.lora is not None),\n"
         "}\n"
         "results = {}\n"
         "for name, kw in settings.items():\n"
         "    nld_jax.generate(model, [prompt], max_new_tokens=96, **kw)          # compile once\n"
         "    results[name] = nld_jax.generate(model, [prompt], max_new_tokens=96, **kw)\n"
         "print(prompt + results['ar'].text[0])"),
    code("print(f\"{'mode':<22}{'tokens':>7}{'forwards':>10}{'TPF':>7}{'tokens/s':>10}\")\n"
         "for name, r in results.items():\n"
         "    print(f'{name:<22}{len(r.tokens[0]):>7}{r.nfe[0]:>10}{r.tpf[0]:>7.2f}{r.tokens_per_second:>10.1f}')\n"
         "spec, ar = results['spec'].tokens[0], results['ar'].tokens[0]\n"
         "print('greedy spec == greedy AR:', spec[:len(ar)] == ar[:len(spec)])"),
    md("## How block diffusion fills a block\n\n`decided_at` records, for every generated token, which forward "
       "fixed it. Within each block, the step at which each slot was revealed shows the decoding order: "
       "confident slots (often whitespace and closing tokens) go first, several per step."),
    code("import numpy as np\n"
         "import matplotlib.pyplot as plt\n"
         "r = results['diffusion (thr 0.9)']\n"
         "C = cfg.block_size\n"
         "at = np.array(r.decided_at[0])\n"
         "n_blocks = len(at) // C\n"
         "steps = np.stack([at[b * C:(b + 1) * C] - at[b * C] for b in range(n_blocks)])  # step within block\n"
         "fig, ax = plt.subplots(figsize=(10, 0.45 * n_blocks + 1))\n"
         "im = ax.imshow(steps, cmap='viridis', aspect='auto')\n"
         "toks = [model.tokenizer.decode([t]) for t in r.tokens[0]]\n"
         "for b in range(n_blocks):\n"
         "    for j in range(C):\n"
         "        ax.text(j, b, repr(toks[b * C + j])[1:-1][:4], ha='center', va='center', fontsize=6, color='w')\n"
         "ax.set_xlabel('slot in block'); ax.set_ylabel('block'); ax.set_title('denoising step that revealed each token')\n"
         "fig.colorbar(im, ax=ax); plt.show()"),
    md("## How self-speculation accepts drafts\n\nEach iteration drafts a whole block bidirectionally, verifies "
       "it causally, and keeps the longest prefix that matches plus one bonus token."),
    code("fig, ax = plt.subplots(figsize=(10, 3))\n"
         "for name in ('spec', 'spec + LoRA'):\n"
         "    at = np.array(results[name].decided_at[0][1:])     # token 0 comes from the prefill\n"
         "    _, accepted = np.unique(at, return_counts=True)\n"
         "    ax.plot(accepted, marker='o', label=f'{name} (mean {accepted.mean():.2f})')\n"
         "ax.set_xlabel('iteration'); ax.set_ylabel('tokens accepted'); ax.legend(); plt.show()"),
    md("## Inside your own `jax.jit`\n\n`nld_jax.decode` is a pure function; see `examples/jit_generate.py` "
       "for a batch generated in all three modes in one compiled program."),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                               "language_info": {"name": "python"}, "accelerator": "GPU"})
nbf.write(nb, "examples/colab_demo.ipynb")
print("wrote examples/colab_demo.ipynb")
