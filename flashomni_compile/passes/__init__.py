"""FX graph passes of the backend: ``match`` finds attention sites (mutates nothing), ``rewrite`` puts the
``flashomni::site_*`` ops in their place, ``dump`` writes the debugging files. ``sites`` holds the records."""
