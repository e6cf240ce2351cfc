"""Benchmarks and studies (python -m benchmarks.run | memory | toyworld | dreambooth)."""


def device_of(parser, value: str):
    """``--device`` as a torch.device, checked against torch and this machine; a bad value is the parser's
    one-line error."""
    import torch
    from tlora.devices import check_device
    from tlora.errors import UsageError
    try:
        return torch.device(check_device(value))
    except UsageError as e:
        parser.error(str(e))
