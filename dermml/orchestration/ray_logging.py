"""Logging set-up for Ray worker processes (``worker_process_setup_hook``); imports nothing heavy.
"""

import logging


def quiet_worker_logs() -> None:
    """Ray Train's placement-group cleaner polls the state API, which lives in the dashboard;
    without one (local runs use ``include_dashboard=False``) it warns every few seconds for the
    whole run. Its real failures are errors, which still show."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)
