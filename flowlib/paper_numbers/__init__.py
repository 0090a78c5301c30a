"""Published result tables of the papers, as data (see :class:`flowlib.results.PaperTable`)."""
