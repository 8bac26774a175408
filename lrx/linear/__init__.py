"""lrx.linear: linear-model learners and closed-form references used by the theory studies
(logistic regression by gradient descent, perceptrons, least squares / ridge / GD predictors).
Import the submodules directly (``lrx.linear.logistic``, ``lrx.linear.regression``, ...)."""
