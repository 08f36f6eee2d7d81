"""Prefect flows: thin wiring over fedkim/ (the library never imports Prefect).

    round.py    flow `fedkim` (deployment `fedkim/round`): one federated round; `python -m flows.round`
    site.py     flow `fedkim-site` (deployments `fedkim-site/<site-id>`): a site's gate, training and upload
    dispatch.py how the round reaches its sites: tasks in its own process, or the sites' deployments
    deploy.py   `fedkim deploy`: the deployments, work pools and the round's schedule, from params.yaml's members"""

import logging

# The library's progress lines (INFO records of the "fedkim" loggers) reach Prefect's console handler on the root
# logger; with PREFECT_LOGGING_EXTRA_LOGGERS=fedkim (scripts/env.sh) they also go to the run's logs in the API.
logging.getLogger("fedkim").setLevel(logging.INFO)
