"""Run-time side of flashomni: per-site state, step controller, policies, feature cache, hooks.

The rewritten graph calls the ``flashomni::site_*`` ops (``kernels/ops.py``), whose bodies call the
functions of ``engine.py`` with the site's static ``SiteSpec`` index and a run-time *anchor* tensor
(one of the site's weights) that tells the layers of a reused compiled block apart.
"""
