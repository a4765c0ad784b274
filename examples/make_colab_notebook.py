"""Writes examples/colab_demo.ipynb (source of truth for the notebook's cells; outputs are not
committed: the test suite executes the notebook top to bottom)."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# nld-jax: four ways to decode one checkpoint\n\n"
       "Nemotron-Labs-Diffusion (NLD) decodes **autoregressively**, by **block diffusion** (a block of masked "
       "tokens filled in parallel), by **linear self-speculation** (diffusion drafts a block, a causal pass "
       "verifies it) and by **quadratic self-speculation** (one forward verifies the last draft and drafts the "
       "next block for every acceptance length) with the same weights. This notebook runs them with `nld_jax`, "
       "compares tokens per forward (TPF) and speed, and shows *how* each mode decodes.\n\n"
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
    md("## Generate in the four modes"),
    code("prompt = 'def read_config(path):\\n    \"\"\"Read a configuration file and return a dict.\"\"\"\\n'\n"
         "settings = {\n"
         "    'ar': dict(mode='ar'),\n"
         "    'diffusion (thr 0.9)': dict(mode='diffusion', threshold=0.9),\n"
         "    'spec': dict(mode='spec'),\n"
         "    'spec + LoRA': dict(mode='spec', use_lora=model.lora is not None),\n"
         "    'spec k=8': dict(mode='spec', block_length=8, use_lora=model.lora is not None),\n"
         "    'spec_quadratic k=8': dict(mode='spec_quadratic', block_length=8, use_lora=model.lora is not None),\n"
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
         "print('greedy spec == greedy AR:', spec[:len(ar)] == ar[:len(spec)])\n"
         "quad = results['spec_quadratic k=8'].tokens[0]\n"
         "print('greedy spec_quadratic == greedy AR:', quad[:len(ar)] == ar[:len(quad)])"),
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
    md("## How self-speculation accepts drafts: linear against quadratic\n\n"
       "**Linear** spec spends two forwards per iteration: a bidirectional draft of the block, then a causal "
       "verify that keeps the longest prefix that matches plus one bonus token. **Quadratic** spec "
       "(`mode='spec_quadratic'`) spends one: the k drafts run causally (their logits verify them), and after "
       "each draft a group of k masks drafts the next block as if exactly that many drafts were accepted; the group "
       "that matches the accepted length is the next draft. A forward holds k + k\u00b2 tokens (72 at k = 8). "
       "Each iteration accepts a little less (the next draft is made before its first token, the bonus, is known), "
       "but one forward instead of two raises the TPF. On a CPU the k\u00b2 tokens cost compute time; on a GPU "
       "a batch-1 forward of a large model costs the same up to a few hundred tokens "
       "(`benchmarks/spec_quadratic_bench.py` prints both).\n\n"
       "`decided_at` gives the forward that fixed each token, so the tokens with the same value are one "
       "iteration's accepted drafts plus its bonus token."),
    code("fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.5))\n"
         "for name in ('spec k=8', 'spec_quadratic k=8'):\n"
         "    at = np.array(results[name].decided_at[0][1:])     # token 0 comes from the prefill\n"
         "    _, accepted = np.unique(at, return_counts=True)\n"
         "    left.plot(np.arange(1, len(accepted) + 1), accepted, marker='o', ms=3,\n"
         "              label=f'{name} (mean {accepted.mean():.2f})')\n"
         "for name in ('ar', 'spec + LoRA', 'spec k=8', 'spec_quadratic k=8'):\n"
         "    r = results[name]\n"
         "    forwards, accepted = np.unique(np.array(r.decided_at[0]), return_counts=True)\n"
         "    right.step(forwards, np.cumsum(accepted), where='post', label=f'{name} (TPF {r.tpf[0]:.2f})')\n"
         "left.set_xlabel('iteration'); left.set_ylabel('tokens accepted (drafts + bonus)')\n"
         "left.set_ylim(0.5, 8 + 2.5); left.legend(loc='upper center', ncol=2)\n"
         "left.set_title(f\"accepted length per iteration (draft LoRA {'on' if model.lora is not None else 'off'})\")\n"
         "right.set_xlabel('forward (prefill = 0)'); right.set_ylabel('tokens generated'); right.legend()\n"
         "right.set_title('tokens against forwards')\n"
         "fig.tight_layout(); plt.show()"),
    md("## Inside your own `jax.jit`\n\n`nld_jax.decode` is a pure function; see `examples/jit_generate.py` "
       "for a batch generated in the three modes ar, diffusion and spec in one compiled program."),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                               "language_info": {"name": "python"}, "accelerator": "GPU"})
nbf.write(nb, "examples/colab_demo.ipynb")
print("wrote examples/colab_demo.ipynb")
