"""Evaluation: perplexity, masked-token accuracy, BLEU/chrF, reward accuracy, win-rate."""
