"""byo_app: the ClientApp, with your loss and metric."""

from byo_app.task import loss_fn, metric_fn
from disco_fl.fl import make_client_app

app = make_client_app(loss_fn=loss_fn, metric_fn=metric_fn)
