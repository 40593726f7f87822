"""Dictionaries of features (sparse autoencoders, transcoders) over the model's hook points.

hooks.py: the hook grammar (resid_pre.L, resid_mid.L, attn_out.L, mlp_in.L, mlp_out.L), sae_lens's hook names
and feature node names (r6.f1234, t5.f42, m5.err). dictionary.py: the Dictionary (encode, decode, digest) and
check_fits. saelens.py: sae_lens's saved format, read and written. splice.py: a hook's activations and the
model run with them replaced, through the engine's layer functions. train.py: train-sae.
"""
