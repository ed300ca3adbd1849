"""saber_operator: kopf operator that reconciles SaberService resources."""
