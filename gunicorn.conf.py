"""gunicorn's configuration file for a checkout and the image: the hub's settings live in the
package (hub/gunicorn_conf.py), so that `hub serve` of a wheel install runs with the same
ones. `gunicorn -c gunicorn.conf.py "hub:create_app()"` and `hub serve` start the same server.
"""

from hub.gunicorn_conf import *  # noqa: F403
