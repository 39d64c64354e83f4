"""A job's strategy: Flower's FedAvg inside small wrappers that each add one thing, composed as Flower composes its
own DP wrappers (`DifferentialPrivacyClientSideFixedClipping(FedAvg(...), ...)`); nothing of Flower is copied.

From the outside in, as the ServerApp stacks them (coordinator.federation.server_app `job_strategy`):

    NodeSelection            only the job's selected, connected nodes; waits for them (selection.py)
      UpdateCapture          screens and weighs every train reply, hands the round to attribution (update_capture.py)
        DriftCorrection      the gradient query and each node's offset, when the job asks for it (drift_correction.py)
          ValuedAggregation  leaves out what attribution excluded, weighs the rest as valued (valued_aggregation.py)
            Flower's DifferentialPrivacyClientSideFixedClipping, when the job asks for DP
              Flower's FedAvg, FedAvgM with server momentum, or the robust strategy the job asks for
              (FedMedian, FedTrimmedAvg, Krum, Bulyan)

The wrappers of one job share its `Participation` (participation.py: who was dropped and why, the fewest nodes a
round may go on with) and its `RoundWeights` (weights.py: what each update weighs).
"""
