"""evomask training tools: the demo now, the MAE trainer later."""
