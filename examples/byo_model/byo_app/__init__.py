"""byo_app: DISCO on Flower with your own model, loss and metric."""
