"""megabatch.train: the training app beside the library (the library never imports it)."""
