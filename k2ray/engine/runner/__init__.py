"""The model runner: a step's inputs in a persistent batch, the forward (eager or compiled), and sampling."""
