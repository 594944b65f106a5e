"""djinn_nb widgets (ipywidgets + plotly): dashboards over a ``djinn_nb.Session``.

Imports only ``djinn_nb`` (never the kernel server). The dashboard arrives with its issue.
"""
