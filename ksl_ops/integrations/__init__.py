"""Adapters to other training frameworks. Each is imported on demand and needs its framework:

    from ksl_ops.integrations.torchreid import ImageKSLEngine   # needs torchreid (0.2.5 or upstream)

``import ksl_ops`` (and ``import ksl_ops.integrations``) never imports a framework.
"""
