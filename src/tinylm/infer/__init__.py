"""Inference: the generation engine, beam search and explanation tools."""
