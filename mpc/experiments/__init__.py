"""The logic behind the notebooks: each notebook is a thin sequence of calls into one
module here (memory, accuracy, speed, cache_behaviour), plus plotting."""
