"""flow.* components: exact normalising-flow layers (coupling, actnorm, inv1x1) and the
approximately invertible free-form flow (aif). Used by ``kind: flow`` specs."""
