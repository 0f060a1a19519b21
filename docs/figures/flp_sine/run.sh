#!/bin/bash
# Issue 12 results, runs (flp3_iid, grad3_iid, flp3_continual ran first, the same commands with FLP α
# unconstrained: rule.nonnegative=false); every run names rule.nonnegative explicitly. 4 networks per run (meta.trials=4).
cd /work/main && . .venv/bin/activate
run() { name=$1; shift
  [ -f outputs/flp/$name/meta_test.json ] && return
  python -m metaplast.train "$@" logger.wandb=false trainer.progress_bar=false resume=false \
    hydra.run.dir=outputs/flp/$name > outputs/flp/$name.log 2>&1
}
BP="rule.terms=f0 feedback.kind=bp feedback.learn=false rule.nonnegative=false"
FA="rule.terms=f0 feedback.kind=fa feedback.learn=false rule.share=all rule.nonnegative=false"
run grad3_continual +experiment=flp_sine_continual $BP
run flp3p_iid +experiment=flp_sine_iid rule.nonnegative=true
run flp3p_continual +experiment=flp_sine_continual rule.nonnegative=true
run fa3_iid +experiment=flp_sine_iid $FA
run fa3_continual +experiment=flp_sine_continual $FA
run flp1p_iid +experiment=flp_sine_iid rule.nonnegative=true rule.plastic=1
run flp1p_continual +experiment=flp_sine_continual rule.nonnegative=true rule.plastic=1
for order in iid continual; do
  run cls_flp2_$order +experiment=flp_classify_$order meta.episodes=200 task.test_episodes=50
  run cls_grad2_$order +experiment=flp_classify_$order meta.episodes=200 task.test_episodes=50 $BP
done
