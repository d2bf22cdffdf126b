"""The console's blueprint: views.py adds sign-in and the request hooks, pages/ the pages."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static")
