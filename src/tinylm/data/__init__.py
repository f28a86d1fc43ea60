"""Shipped corpora and the code that turns text into training batches."""
