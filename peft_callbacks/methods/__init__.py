"""Every PEFT method, one registration each. Importing this package registers them all with the engine.

============================  ==========================================  ===========
method                        module                                      mergeable
============================  ==========================================  ===========
``lora`` (rsLoRA, DoRA)       :mod:`peft_callbacks.methods.lora`          yes
``ia3``                       :mod:`peft_callbacks.methods.ia3`           yes
``vera``                      :mod:`peft_callbacks.methods.vera`          yes
``adalora``                   :mod:`peft_callbacks.methods.adalora`       yes
``loha``                      :mod:`peft_callbacks.methods.loha`          yes
``lokr``                      :mod:`peft_callbacks.methods.lokr`          yes
``oft``                       :mod:`peft_callbacks.methods.oft`           yes
``bottleneck``                :mod:`peft_callbacks.methods.bottleneck`    no
``prompt_tuning``             :mod:`peft_callbacks.methods.prompts.soft`  no
``visual_prompts``            :mod:`peft_callbacks.methods.prompts.visual`  no
============================  ==========================================  ===========
"""

from peft_callbacks.methods import (  # noqa: F401  (registration)
    adalora,
    bottleneck,
    ia3,
    loha,
    lokr,
    lora,
    oft,
    prompts,
    vera,
)
