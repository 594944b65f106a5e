"""djinn_nb widgets (ipywidgets + plotly): dashboards over a ``djinn_nb.Session``.

Imports only ``djinn_nb`` (never the kernel server). ``djinn_nb.Dashboard`` is
``widgets.Dashboard``, resolved lazily so that ``import djinn_nb`` stays light.
"""
from .dashboard import Dashboard

__all__ = ["Dashboard"]
